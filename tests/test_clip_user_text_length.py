"""clip_retrieval text-length report: a tower that does not pool at eos (SigLIP, SigLIP 2, whose tokenizer may
add no eos at all) is not said to keep an eos."""

from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from recipes.clip_retrieval.collator import TextLengthReport, tokenize_texts


def test_texts_cut_as_the_tokenizer_truncates_are_reported_so():
    vocab = {"<pad>": 0, "<unk>": 1, "a": 2, "red": 3, "circle": 4}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>")
    report = TextLengthReport()
    ids = tokenize_texts(["a red circle", "a red"], tokenizer, 2, report, pooled_at_eos=False)
    assert ids == [[2, 3], [2, 3]] and (report.texts, report.truncated, report.tokens_cut) == (2, 1, 1)
    assert str(report) == ("text length: 2 texts, 1 cut to max_length (1 tokens cut, as the tokenizer "
                           "truncates)")
