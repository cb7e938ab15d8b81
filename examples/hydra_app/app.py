"""Run: cd examples/hydra_app && python app.py gpu=t4_16gb"""

import hydra
from hydra.utils import instantiate

from lightning_lowvram import GPUProfile


@hydra.main(config_path="conf", config_name="config", version_base="1.3")
def main(cfg) -> None:
    profile = GPUProfile.from_config(cfg.gpu)
    callbacks = [instantiate(node) for node in cfg.callbacks.values()]
    print(profile.name, profile.memory_gib, [type(c).__name__ for c in callbacks])


if __name__ == "__main__":
    main()
