"""Evaluation: scorers for ASR/TTS (WER, CER), spoken language modelling (sWUGGY, sBLIMP, spoken and
topic StoryCloze) and spoken QA, plus the JSON + Markdown report beside the paper's numbers.

The scorers are pure functions of texts and scores; they never load a model. An item that failed
(no hypothesis, no score, a bad line) is listed with its reason in the result, and every other item
is still scored.
"""
