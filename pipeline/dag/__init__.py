"""Parameters, profiles and the compile stage: the DAG of steps/ made concrete."""
