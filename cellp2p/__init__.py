"""cellp2p: U-Net and pix2pix for microscopy stacks."""

__version__ = "0.1.0"
