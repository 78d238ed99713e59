"""Data layer: tokenizers, built-in corpora (wiki-mini, digits) and loaders for users' files."""

from seqebm.data.corpora import (
    SPLITS,
    ParallelCorpus,
    TextCorpus,
    default_cache_dir,
    list_corpora,
    load_corpus,
    load_parallel_corpus,
    split_keys,
)
from seqebm.data.digits import (
    DIGITS_LENGTH,
    DIGITS_LEVELS,
    DIGITS_SIDE,
    DigitsDataset,
    load_digits_dataset,
)
from seqebm.data.text_files import load_jsonl, load_lines, load_parallel, load_text_file
from seqebm.data.tokenizers import (
    BOS_ID,
    EOS_ID,
    PAD_ID,
    SPECIAL_TOKENS,
    TOKENIZER_KINDS,
    UNK_ID,
    BPETokenizer,
    CharTokenizer,
    Tokenizer,
    build_tokenizer,
    load_tokenizer,
    words,
)
from seqebm.data.wiki import clean_wiki_text

__all__ = [
    "PAD_ID",
    "BOS_ID",
    "EOS_ID",
    "UNK_ID",
    "SPECIAL_TOKENS",
    "TOKENIZER_KINDS",
    "Tokenizer",
    "BPETokenizer",
    "CharTokenizer",
    "load_tokenizer",
    "build_tokenizer",
    "words",
    "SPLITS",
    "TextCorpus",
    "ParallelCorpus",
    "load_corpus",
    "list_corpora",
    "load_parallel_corpus",
    "default_cache_dir",
    "split_keys",
    "load_text_file",
    "load_jsonl",
    "load_lines",
    "load_parallel",
    "clean_wiki_text",
    "DIGITS_LEVELS",
    "DIGITS_SIDE",
    "DIGITS_LENGTH",
    "DigitsDataset",
    "load_digits_dataset",
]
