"""The network and the diffusion, pure torch: the U-Net, the DDPM schedules and loss, sampling, and the diffusers
mapping."""
