"""The fixed sample of the zoo that ``make test`` checks: the architectures fine-tuned most."""

from __future__ import annotations

SAMPLE = (
    "BertForSequenceClassification",
    "BertForMaskedLM",
    "RobertaForSequenceClassification",
    "DistilBertForSequenceClassification",
    "AlbertForSequenceClassification",
    "ElectraForSequenceClassification",
    "DebertaV2ForSequenceClassification",
    "XLMRobertaForSequenceClassification",
    "MPNetForSequenceClassification",
    "ModernBertForSequenceClassification",
    "BartForConditionalGeneration",
    "BartForSequenceClassification",
    "T5ForConditionalGeneration",
    "GPT2LMHeadModel",
    "LlamaForCausalLM",
    "Qwen2ForCausalLM",
    "MistralForCausalLM",
    "PhiForCausalLM",
    "FalconForCausalLM",
    "OPTForCausalLM",
    "BloomForCausalLM",
    "GPTNeoXForCausalLM",
    "ViTForImageClassification",
    "SwinForImageClassification",
    "ConvNextForImageClassification",
    "ResNetForImageClassification",
    "Wav2Vec2ForSequenceClassification",
    "WhisperForAudioClassification",
)

# the ONNX column (invariant e) runs on these: encoders, a decoder, a seq2seq model, vision
ONNX_SUBSET = frozenset(
    {
        "BertForSequenceClassification",
        "RobertaForSequenceClassification",
        "DistilBertForSequenceClassification",
        "AlbertForSequenceClassification",
        "ElectraForSequenceClassification",
        "DebertaV2ForSequenceClassification",
        "XLMRobertaForSequenceClassification",
        "MPNetForSequenceClassification",
        "GPT2LMHeadModel",
        "LlamaForCausalLM",
        "BartForConditionalGeneration",
        "ViTForImageClassification",
        "SwinForImageClassification",
    }
)
