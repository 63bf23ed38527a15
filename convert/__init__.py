"""`python -m convert SRC DST [--dtype bfloat16|float32] [--quant none|int8|fp8] [--force]`: Hugging Face
folder -> Orbax folder.

The logic lives in `vl2_jax.orbax_io.convert_checkpoint`; this package only parses arguments.
"""
