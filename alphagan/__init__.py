"""3D brain MRI generation with the alpha-WGAN-GP of Kwon et al. (MICCAI 2019), as a course you can run."""

__version__ = "0.1.0"
