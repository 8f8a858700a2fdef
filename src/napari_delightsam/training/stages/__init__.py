"""The stages that run the training loop (segmentation, heads, refiner, appearance head, MDKD,
box-decoder tuning) and the recipe that chains them (``recipes/*.json``)."""
