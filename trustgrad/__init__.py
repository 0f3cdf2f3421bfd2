"""trustgrad: secure distributed training (Proof-of-Learning + CKKS homomorphic encryption) on torch.distributed."""

__version__ = "0.1.0"
