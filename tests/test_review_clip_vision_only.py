"""clip_retrieval refuses a checkpoint that is no dual encoder in one line, also when its processor, which
loads before the data, is an image processor alone (a vision tower's checkpoint)."""

import pytest

from recipes.clip_retrieval.train import main


def test_a_vision_only_checkpoint_is_refused_by_name(tmp_path):
    with pytest.raises(ValueError, match=r"clip-vision-pretrained.*: CLIPImageProcessor\w* has no tokenizer: "
                                         r"not a dual encoder; give a CLIP, SigLIP or SigLIP 2 checkpoint"):
        main(["--model_name_or_path", "tiny:clip-vision-pretrained", "--output_dir", str(tmp_path / "run"),
              "--report_to", "none", "--max_steps", "1"])
