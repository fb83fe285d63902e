"""fleetsim strategies: one file per strategy, each a Flower strategy plus its device functions."""
