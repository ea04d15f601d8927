"""Pure-PyTorch adapters: apply, save, load and merge without Lightning.

>>> adapter = BOFT(target_modules=["qkv", "proj", "fc1", "fc2"], block_size=8, n_butterfly_factors=2)
>>> adapter.apply(model)                 # doctest: +SKIP
>>> find_strategy(model) is adapter      # doctest: +SKIP
"""

from .base import (AdaptedLinear, AdapterStrategy, adapted_layers, count_parameters, detach_strategy, find_strategy,
                   get_strategy)
from .boft import BOFT, OFT, BOFTLinear, orthogonality_error
from .io import (adapter_state_dict, load_adapter, merge_adapters, merged_state_dict, read_adapter_config,
                 save_adapter)
from .lora import DoRA, DoRALinear, LoRA, LoRALinear
from .lora_export import LoraExport, export_lora
from .peft_export import export_peft_adapter, peft_export_problem
from .quantized import QuantizationReport, QuantizedLinear, dense_weight, quantize_frozen_linears
from .svft import SVFT, SVDProvider, SVFTLinear
from .targets import resolve_targets
from .vera import VeRA, VeRALinear

__all__ = ["AdapterStrategy", "AdaptedLinear", "BOFT", "OFT", "SVFT", "LoRA", "DoRA", "VeRA", "BOFTLinear",
           "SVFTLinear", "LoRALinear", "DoRALinear", "VeRALinear", "SVDProvider", "merge_adapters",
           "merged_state_dict", "save_adapter", "load_adapter", "adapter_state_dict", "read_adapter_config",
           "adapted_layers", "count_parameters", "resolve_targets", "find_strategy", "get_strategy",
           "detach_strategy", "orthogonality_error", "export_peft_adapter", "peft_export_problem",
           "export_lora", "LoraExport", "quantize_frozen_linears", "QuantizedLinear", "QuantizationReport",
           "dense_weight"]
