"""A recipe refuses in one line a checkpoint whose processor has no tokenizer (a vision tower's checkpoint):
the processor loads before the data, whose texts are checked against its tokenizer's special strings."""

import pytest

from recipes.clip_retrieval.train import main as clip_main
from recipes.qlora_vqa.train import main as qlora_main


@pytest.mark.parametrize("main", [clip_main, qlora_main])
def test_a_vision_only_checkpoint_is_refused_by_name(tmp_path, main):
    with pytest.raises(ValueError, match=r"clip-vision-pretrained.*: CLIPImageProcessor\w* has no tokenizer: "
                                         r"the checkpoint has no text model for the recipe to train"):
        main(["--model_name_or_path", "tiny:clip-vision-pretrained", "--output_dir", str(tmp_path / "run"),
              "--report_to", "none", "--max_steps", "1"])
