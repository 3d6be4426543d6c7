"""elbox: VAEs and DDPMs, both trained by maximising an evidence lower bound.

    import elbox
    model = elbox.load("runs/ddpm-digits")     # rebuilt from its checkpoint, EMA weights
    samples = model.sample(16)

The public names are imported on first use, so ``import elbox`` stays fast and light.
"""

__version__ = "0.1.0"

_EXPORTS = {
    "load": "elbox.api",
    "evaluate": "elbox.api",
    "train": "elbox.training.loop",
    "compile_networks": "elbox.compiling",  # torch.compile a model's networks (what --compile does)
    "RunConfig": "elbox.config",
    "DataConfig": "elbox.config",
    "TrainConfig": "elbox.config",
    "MODELS": "elbox.config",
    "DDPM": "elbox.objectives.ddpm",
    "DDPMConfig": "elbox.objectives.ddpm",
    "VAE": "elbox.objectives.vae",
    "VAEConfig": "elbox.objectives.vae",
    "LDM": "elbox.objectives.latent",
    "LDMConfig": "elbox.objectives.latent",
    "Terms": "elbox.objectives.terms",
    "bits_per_dim": "elbox.objectives.terms",
    "load_dataset": "elbox.data",
    "to_model": "elbox.data",  # uint8 images -> a model's data range
    "from_model": "elbox.data",  # and back
    "UserError": "elbox.errors",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'elbox' has no attribute {name!r}")
