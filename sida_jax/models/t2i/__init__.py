"""Text-to-image teachers and their text encoders: SD U-Net (`sd_unet`), CLIP text encoder (`clip_text`)."""
