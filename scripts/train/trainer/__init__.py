"""The training job that scripts/train/train.py runs, one concern a module:

    args          the hyperparameters, as SageMaker hands them over
    report        lines on stdout, TrainError, SageMaker's failure file
    distributed   this process's Place in the job (rank, world size, device)
    data          the class-folder channels, their datasets and loaders
    model         the network, its pretrained weights
    heads         the counting heads' loss, test-time flips and scores
    optim         optimizer, weight decay, lr schedule
    frozen        what trains on a frozen part's output: a head (ViewMean) or the blocks after it (Tail)
    features      the frozen part's output, computed once per photo and view and cached
    epoch         one training pass and one validation pass
    loop          the epochs: metric lines, checkpoints, the kept epoch
    tails         several tails on one cached front (--tails)
    refit         the tails learn from the validation split too, cross-fitted (--refit)
    recall_floor  the end cuts of mean decoding (--recall_floor)
    checkpoint    resuming a restarted job
    artifact      the model directory: weights, model_config.json, code/
    job           one training job from parsed arguments to the model directory

Step-container code: it imports `inference`, `augment` and `debugger` as the container does
(beside train.py in /opt/ml/code), never pipeline/ or steps/.
"""
import os

# OpenMP threads that spin while waiting for work collapse when the cores are shared with other
# processes (2 cores, one other busy process: ResNet-18 at 96 px trained at 17 img/s spinning,
# 34-50 img/s passive). Set before torch loads OpenMP (this package's modules import it); an
# explicit setting wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
