"""The one training loop (``run.py``) and what it needs: batches, optimiser, run folder, resume state."""
