"""Hand-written compute kernels, each beside a plain-PyTorch reference it is tested against."""
