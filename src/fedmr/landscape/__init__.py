"""``fedmr landscape``: sharpness and loss landscapes of trained models (docs/landscape.md).

``hessian`` (power iteration and Hutchinson's trace on Hessian-vector products), ``objective``
(the training loss as a function of the weights, BatchNorm in evaluation mode), ``directions``
(filter-normalised directions, curves, straight paths), ``source`` (which model, which run, which
data), ``measure`` (the JSON document), ``plots`` and ``cli``.
"""
