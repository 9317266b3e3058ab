"""One declaration per step; `DAG` is the whole pipeline in execution order.

Preprocess -> Tune -> Train -> Evaluate -> CheckAccuracy --yes--> Register -> Deploy(staging) -> SmokeTest -> CheckSmokeTest
                                                         \\--no---> AccuracyTooLow (Fail)                        \\--no---> SmokeTestFailed (Fail)
"""
from steps import check_accuracy, deploy, evaluate, preprocess, register, smoke, train, tune
from steps.base import Dag

DAG = Dag((
    preprocess.STEP,
    tune.STEP,
    train.STEP,
    evaluate.STEP,
    check_accuracy.STEP,
    register.STEP,
    deploy.STEP,
    smoke.STEP,
    smoke.CHECK,
    check_accuracy.FAIL,
    smoke.FAIL,
))
