# The shipped Hydra tree. Importing it (Hydra does, to read pkg://lightning_lowvram.conf) puts the nodes of strategies
# registered from outside the package into Hydra's ConfigStore (lightning_lowvram.hydra_setup).
import lightning_lowvram.hydra_setup  # noqa: F401
