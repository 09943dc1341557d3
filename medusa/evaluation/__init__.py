"""Measuring speed the way the field does: `medusa bench` on MT-Bench / Spec-Bench questions."""
