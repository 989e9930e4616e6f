"""Training and evaluating DRENet on labelled CT slices (data, augmentation, losses, loop, metrics), and comparing it with plain classifiers.

Kept out of the inference path: `covidct analyze` never imports this package.
"""
