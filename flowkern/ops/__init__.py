"""Op families: validation, backend choice, torch.library registration, autograd."""
