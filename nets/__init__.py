"""The networks, plain torch modules: the U-Net (teacher and student), SinusCycle-GAN's generator and
discriminator, and the training-free post-processing control. engine/networks.py loads them
from checkpoints."""
