"""Writes the config files of three published pipeline folders (no weights, no tokenizer files):
stable-diffusion-v1-5, stable-diffusion-2-1-base and PixArt-alpha/PixArt-XL-2-512x512, as
  NAME/model_index.json, NAME/{unet|transformer,text_encoder,vae}/config.json, NAME/scheduler/scheduler_config.json.
The architecture entries are the published ones (the same values tests/test_sd_unet.py, test_clip_text.py,
test_pixart.py and test_t5.py build with); `--mode plan` sizes a run from them (tests/test_plan.py).

    python tests/data/t2i/published/make_published.py            # (re)write the json files
    python tests/data/t2i/published/make_published.py --count    # parity env: parameter counts by diffusers /
                                                                 # transformers on torch's meta device
"""
import argparse
import json
import os

HERE = os.path.dirname(os.path.abspath(__file__))

SD15_UNET = dict(_class_name='UNet2DConditionModel', _diffusers_version='0.6.0', act_fn='silu', attention_head_dim=8,
                 block_out_channels=[320, 640, 1280, 1280], center_input_sample=False, cross_attention_dim=768,
                 down_block_types=['CrossAttnDownBlock2D'] * 3 + ['DownBlock2D'], downsample_padding=1,
                 flip_sin_to_cos=True, freq_shift=0, in_channels=4, layers_per_block=2, mid_block_scale_factor=1,
                 norm_eps=1e-05, norm_num_groups=32, out_channels=4, sample_size=64,
                 up_block_types=['UpBlock2D'] + ['CrossAttnUpBlock2D'] * 3)
SD21_BASE_UNET = dict(SD15_UNET, _diffusers_version='0.10.0.dev0', attention_head_dim=[5, 10, 20, 20],
                      cross_attention_dim=1024, dual_cross_attention=False, num_class_embeds=None,
                      only_cross_attention=False, use_linear_projection=True)
SD15_TEXT = dict(_name_or_path='openai/clip-vit-large-patch14', architectures=['CLIPTextModel'], attention_dropout=0.0,
                 bos_token_id=0, dropout=0.0, eos_token_id=2, hidden_act='quick_gelu', hidden_size=768,
                 initializer_factor=1.0, initializer_range=0.02, intermediate_size=3072, layer_norm_eps=1e-05,
                 max_position_embeddings=77, model_type='clip_text_model', num_attention_heads=12,
                 num_hidden_layers=12, pad_token_id=1, projection_dim=768, torch_dtype='float32',
                 transformers_version='4.22.0.dev0', vocab_size=49408)
SD21_BASE_TEXT = dict(SD15_TEXT, _name_or_path='hf-models/stable-diffusion-v2-768x768/text_encoder',
                      hidden_act='gelu', hidden_size=1024, intermediate_size=4096, num_attention_heads=16,
                      num_hidden_layers=23, projection_dim=512, transformers_version='4.25.0.dev0')
SD_VAE = dict(_class_name='AutoencoderKL', _diffusers_version='0.6.0', act_fn='silu',
              block_out_channels=[128, 256, 512, 512], down_block_types=['DownEncoderBlock2D'] * 4, in_channels=3,
              latent_channels=4, layers_per_block=2, norm_num_groups=32, out_channels=3, sample_size=512,
              up_block_types=['UpDecoderBlock2D'] * 4)
SD_SCHEDULER = dict(_class_name='PNDMScheduler', _diffusers_version='0.6.0', beta_end=0.012,
                    beta_schedule='scaled_linear', beta_start=0.00085, num_train_timesteps=1000, set_alpha_to_one=False,
                    skip_prk_steps=True, steps_offset=1, trained_betas=None, clip_sample=False)
SD_INDEX = dict(_class_name='StableDiffusionPipeline', _diffusers_version='0.6.0',
                feature_extractor=['transformers', 'CLIPImageProcessor'],
                safety_checker=['stable_diffusion', 'StableDiffusionSafetyChecker'],
                scheduler=['diffusers', 'PNDMScheduler'], text_encoder=['transformers', 'CLIPTextModel'],
                tokenizer=['transformers', 'CLIPTokenizer'], unet=['diffusers', 'UNet2DConditionModel'],
                vae=['diffusers', 'AutoencoderKL'])
PIXART_TRANSFORMER = {
    '_class_name': 'Transformer2DModel', '_diffusers_version': '0.22.0.dev0',
    'activation_fn': 'gelu-approximate', 'attention_bias': True, 'attention_head_dim': 72,
    'attention_type': 'default', 'caption_channels': 4096, 'cross_attention_dim': 1152,
    'double_self_attention': False, 'dropout': 0.0, 'in_channels': 4, 'norm_elementwise_affine': False,
    'norm_eps': 1e-06, 'norm_num_groups': 32, 'norm_type': 'ada_norm_single', 'num_attention_heads': 16,
    'num_embeds_ada_norm': 1000, 'num_layers': 28, 'num_vector_embeds': None, 'only_cross_attention': False,
    'out_channels': 8, 'patch_size': 2, 'sample_size': 64, 'upcast_attention': False,
    'use_linear_projection': False}
T5_V1_1_XXL = {
    'architectures': ['T5EncoderModel'], 'd_ff': 10240, 'd_kv': 64, 'd_model': 4096, 'decoder_start_token_id': 0,
    'dense_act_fn': 'gelu_new', 'dropout_rate': 0.1, 'eos_token_id': 1, 'feed_forward_proj': 'gated-gelu',
    'initializer_factor': 1.0, 'is_encoder_decoder': True, 'is_gated_act': True, 'layer_norm_epsilon': 1e-06,
    'model_type': 't5', 'num_decoder_layers': 24, 'num_heads': 64, 'num_layers': 24, 'output_past': True,
    'pad_token_id': 0, 'relative_attention_max_distance': 128, 'relative_attention_num_buckets': 32,
    'tie_word_embeddings': False, 'torch_dtype': 'float32', 'transformers_version': '4.33.0.dev0',
    'use_cache': True, 'vocab_size': 32128}
PIXART_SCHEDULER = dict(_class_name='DPMSolverMultistepScheduler', _diffusers_version='0.22.0.dev0',
                        algorithm_type='dpmsolver++', beta_end=0.02, beta_schedule='linear', beta_start=0.0001,
                        dynamic_thresholding_ratio=0.995, lower_order_final=True, num_train_timesteps=1000,
                        prediction_type='epsilon', sample_max_value=1.0, solver_order=2, solver_type='midpoint',
                        steps_offset=0, thresholding=False, trained_betas=None, use_karras_sigmas=False)
PIXART_INDEX = dict(_class_name='PixArtAlphaPipeline', _diffusers_version='0.22.0.dev0',
                    scheduler=['diffusers', 'DPMSolverMultistepScheduler'], text_encoder=['transformers', 'T5EncoderModel'],
                    tokenizer=['transformers', 'T5Tokenizer'], transformer=['diffusers', 'Transformer2DModel'],
                    vae=['diffusers', 'AutoencoderKL'])

FOLDERS = {
    'sd15': {'model_index.json': SD_INDEX, 'unet/config.json': SD15_UNET, 'text_encoder/config.json': SD15_TEXT,
             'vae/config.json': SD_VAE, 'scheduler/scheduler_config.json': SD_SCHEDULER},
    'sd21_base': {'model_index.json': dict(SD_INDEX, _diffusers_version='0.10.0.dev0'),
                  'unet/config.json': SD21_BASE_UNET, 'text_encoder/config.json': SD21_BASE_TEXT,
                  'vae/config.json': dict(SD_VAE, _diffusers_version='0.10.0.dev0', sample_size=768),
                  'scheduler/scheduler_config.json': dict(SD_SCHEDULER, _diffusers_version='0.10.0.dev0',
                                                          prediction_type='epsilon')},
    'pixart_xl_2_512': {'model_index.json': PIXART_INDEX, 'transformer/config.json': PIXART_TRANSFORMER,
                        'text_encoder/config.json': T5_V1_1_XXL, 'vae/config.json': SD_VAE,
                        'scheduler/scheduler_config.json': PIXART_SCHEDULER},
}


def write():
  for name, files in FOLDERS.items():
    for path, content in files.items():
      target = os.path.join(HERE, name, path)
      os.makedirs(os.path.dirname(target), exist_ok=True)
      with open(target, 'w', encoding='utf-8') as f:
        json.dump(content, f, indent=2, sort_keys=True)
        f.write('\n')


def count():
  """Parameter counts of diffusers' / transformers' own modules for these configs (meta device: no memory)."""
  import diffusers  # pylint: disable=import-outside-toplevel
  import torch  # pylint: disable=import-outside-toplevel
  import transformers  # pylint: disable=import-outside-toplevel
  builders = {'unet': lambda c: diffusers.UNet2DConditionModel.from_config(c),
              'transformer': lambda c: diffusers.PixArtTransformer2DModel.from_config(c),
              'vae': lambda c: diffusers.AutoencoderKL.from_config(c),
              'text_encoder': lambda c: (transformers.CLIPTextModel(transformers.CLIPTextConfig(**c))
                                         if c['architectures'] == ['CLIPTextModel'] else
                                         transformers.T5EncoderModel(transformers.T5Config(**c)))}
  for name, files in FOLDERS.items():
    for path, config in files.items():
      part = path.split('/')[0]
      if part in builders:
        with torch.device('meta'):
          module = builders[part](dict(config))
        print(name, part, sum(p.numel() for p in module.parameters()))


if __name__ == '__main__':
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--count', action='store_true')
  if parser.parse_args().count:
    count()
  else:
    write()
