"""The De-LightSAM network, one file per paper component."""

from .delightsam import DeLightSAM, DeLightSAMOutput
from .losses import delightsam_loss

__all__ = ["DeLightSAM", "DeLightSAMOutput", "delightsam_loss"]
