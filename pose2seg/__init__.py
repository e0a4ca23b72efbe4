"""Pose2Seg in pure PyTorch: config, skeleton constants, ops, model, loss, engine, inference.

Never imports ray, mlflow, ``preprocessing`` or ``workflows``.
"""
