"""What every stage shares: the command line and presets (utils), diffusers pipelines and
sampling (models), the readers of published datasets (data), judges and scorers (scorers,
quality_metrics, judge_client), statistics (stats), figures (plots), the toy world (toyworld)
and stage 5's registries (registry).

What it is not: the paper's equations (common.py) or any stage's own steps (the numbered
scripts). Nothing here imports a stage, common.py or a system.
"""
