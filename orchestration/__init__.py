"""Orchestration: training, the main job, checkpoints and the evaluation runner (above models and metrics)."""
