"""Frozen pretrained feature networks (GDD's Projected-GAN discriminator) in Flax, NHWC, evaluation mode.

  vgg.VGG                             torchvision vgg16_bn
  efficientnet.EfficientNet           timm tf_efficientnet_lite0
  deit.DistilledVisionTransformer     timm deit_base_distilled_patch16_224

Each module returns the intermediate maps Projected GAN taps (and, with its head, the class logits); each
file has a strict `variables_from_state_dict(module, state_dict)` taking the torchvision/timm state_dict
names. `torch_layers` holds the PyTorch-convention layers they share.
"""
