"""Example user strategies (plugged in by import path, e.g. ``examples.head_finetune:HeadFinetune``)."""
