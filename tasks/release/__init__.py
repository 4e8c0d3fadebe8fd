"""The release: what a model is and how it reaches the shop.

Recipes, packaging into one pyfunc (models-from-code), the registry's primitives and the
promotion gate.
"""
