"""Entry point: `python train.py [+exp=NAME] [key=value ...]` or `torchrun ... train.py dist=ddp`."""

import sys

import hydra
from omegaconf import DictConfig

from lowbit.trainer.config import check_overrides, register_configs

register_configs()


@hydra.main(config_path="configs", config_name="train", version_base="1.3")
def main(cfg: DictConfig) -> None:
    from lowbit.trainer.run import run

    run(cfg)


if __name__ == "__main__":
    problem = check_overrides(sys.argv[1:])
    if problem:
        print(f"Error: {problem}", file=sys.stderr)
        sys.exit(2)
    main()
