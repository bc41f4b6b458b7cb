"""Tests of captrt.bench."""
