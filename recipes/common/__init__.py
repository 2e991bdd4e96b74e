"""What every recipe would otherwise write again.

The spine a train.py reads: `args` (argument dataclasses, YAML + flags), `models` (loading), `peft_setup`
(LoRA, freezing, parameter groups), `trainer` (`RecipeTrainer`, the one Trainer subclass), `run` (the run
loop). Data: `data` (records, the embedded default), `lengths` (length budget, padding), `captions` and
`chat` (what the caption and chat recipes share). Options: `feature_cache`, `losses`, `quantization`,
`merge`, `sampling`. Built on first use: `tiny/` (tiny models and their pre-training) in `cache`.
"""
