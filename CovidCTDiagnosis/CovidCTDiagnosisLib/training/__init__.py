"""Training and evaluating DRENet on labelled CT slices: data, augmentation, losses, loop, metrics.

Kept out of the inference path: `covidct analyze` never imports this package.
"""
