"""The ``python -m glance_lightning cache --config ...`` command: fill the encode cache in a process of its own.

The musubi-style two-step workflow: this process loads only the VAE and the text encoders, encodes every
training image, caption, caption-dropout prompt and sampling prompt of the config into the on-disk cache
(``model.init_args.encode_cache``) and exits; ``fit`` with the same config then loads no text encoder. It takes
the same ``--config`` files and overrides as ``fit``.
"""

from __future__ import annotations

import time

from glance_lightning.trainer_cli import run_lightning_cli

HELP = __doc__.split("\n\n")[0] + "\n\nusage: python -m glance_lightning cache --config FILE [fit overrides]\n"


def run_cache_command(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help"):
        print(HELP)
        return 0 if argv else 2
    from glance_lightning.callbacks.samples import ChainedSampleCallback

    cli = run_lightning_cli(argv, run=False)
    module, data, trainer = cli.model, cli.datamodule, cli.trainer
    if module.encode_store() is None:
        from glance_lightning.errors import ConfigError

        raise ConfigError("model.encode_cache is null: nothing to fill; set it to `user` or a folder")
    data.setup("fit")
    samples = data.train_samples
    module.check_samples(samples)
    for callback in trainer.callbacks:
        if isinstance(callback, ChainedSampleCallback):
            callback.setup(trainer, module, "fit")  # registers its prompts
    store = module.encode_store()
    if module.all_encoded(samples):
        print(f"cache: every entry is already in {store.root}; `fit` will load no text encoder")
        return 0
    started = time.perf_counter()
    module.fit_timings = {}
    module.load_encoders()
    module.encode_before_transformer_moves(samples, trainer.strategy.root_device)
    print(f"cache: wrote {store.misses} entries to {store.root} in {time.perf_counter() - started:.1f}s "
          f"({store.hits} were there); `fit` with this config will load no text encoder")
    return 0
