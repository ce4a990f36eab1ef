"""Training layer: focal loss and the sine-wave schedule, the Lightning module, fitting one member
(model x seed) in named steps, and the Optuna study that tunes them.
"""
