"""one-peace-motion: multichannel motion and sensor sequences as a one-peace modality (entry point ``motion``)."""

from one_peace_motion.plugin import MotionAdapter, MotionModality, MotionOptions, load_motion

__all__ = ["MotionAdapter", "MotionModality", "MotionOptions", "load_motion"]
