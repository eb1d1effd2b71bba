"""Encoders: STRAINER pretraining (one process or torchrun), where encoders come from, cards."""
