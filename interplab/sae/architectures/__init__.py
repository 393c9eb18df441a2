"""Built-in SAE architectures, one file each; importing this package registers them."""

from interplab.sae.architectures.batchtopk import BatchTopKSAE
from interplab.sae.architectures.gated import GatedSAE
from interplab.sae.architectures.jumprelu import JumpReLUSAE
from interplab.sae.architectures.matryoshka import MatryoshkaSAE
from interplab.sae.architectures.relu import ReLUSAE
from interplab.sae.architectures.topk import TopKSAE

__all__ = ["BatchTopKSAE", "GatedSAE", "JumpReLUSAE", "MatryoshkaSAE", "ReLUSAE", "TopKSAE"]
