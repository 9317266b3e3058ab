"""One declaration per step; `DAG` is the whole pipeline in execution order.

Preprocess -> Tune -> Train -> Evaluate -> CheckAccuracy --yes--> Register -> Deploy(staging)
                                                         \\--no---> AccuracyTooLow (Fail)
"""
from steps import check_accuracy, deploy, evaluate, preprocess, register, train, tune
from steps.base import Dag

DAG = Dag((
    preprocess.STEP,
    tune.STEP,
    train.STEP,
    evaluate.STEP,
    check_accuracy.STEP,
    register.STEP,
    deploy.STEP,
    check_accuracy.FAIL,
))
