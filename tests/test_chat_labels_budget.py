"""The length budget's report names the reason a conversation was dropped: a conversation whose first
answer fits, but whose later turn places an image past the cut, is dropped too (a cut would leave that
image's pixels without its tokens), and the report says so instead of "first answer over budget"."""

from PIL import Image

from recipes.common.chat import ChatLengthReport, chat_encoder, fit_conversation, to_messages
from recipes.common.models import load_processor, resolve_model_path


def test_a_drop_for_an_image_past_the_cut_is_reported_as_such(tmp_path):
    encoder = chat_encoder(load_processor(resolve_model_path("tiny:llava"), "llava"))
    turns = [{"from": "human", "value": "<image>\nfirst?"}, {"from": "gpt", "value": "red."},
             {"from": "human", "value": "now this <image> one?"}, {"from": "gpt", "value": "blue."}]
    images = [Image.new("RGB", (64, 64), c) for c in ("red", "blue")]
    enc = encoder.encode(to_messages(turns, n_images=2), images)
    assert enc.turn_ends[0] < enc.image_end < len(enc.input_ids)  # the first answer ends before image 2
    report = ChatLengthReport()
    assert fit_conversation(enc, len(enc.input_ids) - 1, report) is None
    assert (report.samples, report.cut, report.dropped) == (1, 0, 1)
    assert "1 dropped (no cut after a whole answer that keeps every image fits)" in str(report)
    assert "first answer" not in str(report)
