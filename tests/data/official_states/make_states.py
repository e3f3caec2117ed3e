"""Writes small SiD training states the way the official training loops write them, plus references.

Needs torch and the two official SiD source trees (mingyuanzhou/SiD, branches main and sida; not part
of this repository), exported to folders of your choice with `git archive BRANCH | tar -x -C FOLDER`:

  python tests/data/official_states/make_states.py --sid-main SID_MAIN_FOLDER --sid-sida SID_SIDA_FOLDER

Files (all tiny networks with seeded random weights):
  sid_main_state.pt        SiD main: torch.save(dict(fake_score=, G=, G_ema= modules, *_optimizer_state))
  sida_edm_state.pt        SiD sida, EDM: torch.save(dict(fake_score_state=, G_state=, G_ema_state= state_dicts, ...))
  sida_edm2_state.pt       SiD sida, EDM2: the same dict with every state_dict tensor cast to float16
  legacy_state_dict.pth    a state_dict saved in torch's legacy (non-zip) format, strided and shared tensors
  <stem>_reference.npz     torch's own float32 state_dict of G_ema (or of the legacy state_dict)
  <stem>.json              class name and constructor kwargs of the teacher the file goes with
The persistence layer pickles each class's module source; it is replaced by '<source omitted>'.
"""
import argparse
import copy
import importlib
import json
import pathlib
import sys

import numpy as np
import torch

HERE = pathlib.Path(__file__).resolve().parent
OMITTED = '<source omitted>'


def _import_tree(tree):
  """Imports modules from an official source tree, dropping modules of a previously imported tree."""
  for name in list(sys.modules):
    if name.split('.')[0] in ('training', 'torch_utils', 'dnnlib', 'sida_training', 'sida_training_edm2', 'edm2'):
      del sys.modules[name]
  sys.path.insert(0, str(tree))
  persistence = importlib.import_module('torch_utils.persistence')
  dnnlib = importlib.import_module('dnnlib')
  return persistence, dnnlib


def _omit_sources(persistence):
  for decorator in persistence._decorators:  # pylint: disable=protected-access
    decorator._orig_module_src = OMITTED  # pylint: disable=protected-access


def _randomize(module, seed):
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for p in module.parameters():
      p.add_(torch.randn(p.shape, generator=gen) * 0.05)


def _optimizer(module, seed):
  """An Adam optimiser as the loops configure it, after one step on random gradients."""
  opt = torch.optim.Adam(module.parameters(), lr=1e-5, betas=(0.0, 0.999), eps=1e-8)
  gen = torch.Generator().manual_seed(seed)
  for p in module.parameters():
    p.grad = torch.randn(p.shape, generator=gen)
  opt.step()
  opt.zero_grad(set_to_none=True)
  return opt


def _three_networks(true_score, seed):
  """fake_score, G (train mode copies of the teacher, as the loops make them), G_ema."""
  _randomize(true_score, seed)
  fake_score = copy.deepcopy(true_score).train().requires_grad_(True)
  G = copy.deepcopy(true_score).train().requires_grad_(True)  # pylint: disable=invalid-name
  fake_opt, g_opt = _optimizer(fake_score, seed + 1), _optimizer(G, seed + 2)
  G_ema = copy.deepcopy(G).eval().requires_grad_(False)  # pylint: disable=invalid-name
  _randomize(G_ema, seed + 3)  # an EMA that differs from G
  return fake_score, G, G_ema, fake_opt, g_opt


def _save_reference(stem, module, teacher_class, teacher_kwargs):
  np.savez(HERE / f'{stem}_reference.npz',
           **{k: v.detach().float().numpy() for k, v in module.state_dict().items()})
  (HERE / f'{stem}.json').write_text(json.dumps(
      {'class_name': teacher_class, 'init_kwargs': teacher_kwargs}, indent=1) + '\n')


EDM_KWARGS = dict(img_resolution=4, img_channels=1, label_dim=0, use_fp16=False, model_type='SongUNet',
                  model_channels=4, channel_mult=[1], num_blocks=0, attn_resolutions=[], dropout=0.0,
                  embedding_type='positional', encoder_type='standard', decoder_type='standard',
                  channel_mult_noise=1, channel_mult_emb=1, resample_filter=[1, 1])


def sid_main(tree):
  persistence, dnnlib = _import_tree(tree)
  torch.manual_seed(0)
  teacher = dnnlib.util.construct_class_by_name(class_name='training.networks.EDMPrecond', **EDM_KWARGS)
  fake_score, G, G_ema, fake_opt, g_opt = _three_networks(teacher.eval().requires_grad_(False), 10)  # pylint: disable=invalid-name
  _omit_sources(persistence)
  # training/sid_training_loop.py: save_pt(pt=dict(fake_score=..., G=..., G_ema=..., ...)) = torch.save
  torch.save(dict(fake_score=fake_score, G=G, G_ema=G_ema, fake_score_optimizer_state=fake_opt.state_dict(),
                  g_optimizer_state=g_opt.state_dict()), HERE / 'sid_main_state.pt')
  _save_reference('sid_main_state', G_ema, 'EDMPrecond', dict(G_ema.init_kwargs))


def sida_edm(tree):
  _, dnnlib = _import_tree(tree)
  torch.manual_seed(1)
  kwargs = dict(EDM_KWARGS, model_type='SongUNet_EncoderDecoder')
  teacher = dnnlib.util.construct_class_by_name(
      class_name='sida_training.sida_networks.EDMPrecond_EncoderDecoder', **kwargs)
  fake_score, G, G_ema, fake_opt, g_opt = _three_networks(teacher.eval().requires_grad_(False), 20)  # pylint: disable=invalid-name
  # sida_training/sida_training_loop.py: state_dicts only
  torch.save(dict(fake_score_state=fake_score.state_dict(), G_state=G.state_dict(), G_ema_state=G_ema.state_dict(),
                  fake_score_optimizer_state=fake_opt.state_dict(), g_optimizer_state=g_opt.state_dict()),
             HERE / 'sida_edm_state.pt')
  _save_reference('sida_edm_state', G_ema, 'EDMPrecond', EDM_KWARGS)


EDM2_KWARGS = dict(img_resolution=4, img_channels=2, label_dim=3, model_channels=4, channel_mult=[1],
                   num_blocks=1, attn_resolutions=[], dropout=0.0, use_fp16=False)


def sida_edm2(tree):
  _, dnnlib = _import_tree(tree)
  torch.manual_seed(2)
  name = 'sida_training_edm2.sida_networks_edm2'
  fake_score = dnnlib.util.construct_class_by_name(class_name=f'{name}.EDM_2_Precond_EncoderDecoder',
                                                   force_normalization=True, use_gan=True, logvar_channels=4,
                                                   **EDM2_KWARGS)
  G = dnnlib.util.construct_class_by_name(class_name=f'{name}.EDM_2_Precond_Generator',  # pylint: disable=invalid-name
                                          force_normalization=True, use_gan=True, **EDM2_KWARGS)
  _randomize(fake_score, 30)
  _randomize(G, 31)
  fake_opt, g_opt = _optimizer(fake_score, 32), _optimizer(G, 33)
  G_ema = copy.deepcopy(G).eval().requires_grad_(False)  # pylint: disable=invalid-name
  _randomize(G_ema, 34)
  pt = dict(fake_score_state=fake_score.state_dict(), G_state=G.state_dict(), G_ema_state=G_ema.state_dict(),
            fake_score_optimizer_state=fake_opt.state_dict(), g_optimizer_state=g_opt.state_dict())
  # sida_training_edm2/sida_training_loop_edm2.py save_fp16_pt: tensors of each dict to float16
  pt = {key: {k: v.half() if torch.is_tensor(v) else v for k, v in value.items()} for key, value in pt.items()}
  torch.save(pt, HERE / 'sida_edm2_state.pt')
  np.savez(HERE / 'sida_edm2_state_reference.npz', **{k: v.float().numpy() for k, v in pt['G_ema_state'].items()})
  # The teacher of an EDM2 SiD run is an EDM2 Precond with the same U-Net.
  teacher_kwargs = {k: v for k, v in EDM2_KWARGS.items()}
  (HERE / 'sida_edm2_state.json').write_text(json.dumps(
      {'class_name': 'Precond', 'init_kwargs': dict(teacher_kwargs, logvar_channels=4)}, indent=1) + '\n')


def legacy_state_dict():
  gen = torch.Generator().manual_seed(3)
  base = torch.randn(6, 5, generator=gen)
  shared = torch.randn(24, generator=gen)
  state = {
      'conv.weight': torch.randn(4, 3, 3, 3, generator=gen),
      'fc.weight': base.t(),                       # strided (transposed)
      'fc.bias': shared[2:8],                      # offset into a shared storage
      'proj.weight': shared[8:20].view(3, 4),      # the same storage
      'half': torch.randn(5, generator=gen).half(),
      'bf16': torch.randn(2, 3, generator=gen).to(torch.bfloat16),
      'bn.num_batches_tracked': torch.tensor(7),
      'mask': torch.tensor([True, False, True, True]),
      'empty': torch.zeros(0, 3),
  }
  torch.save(state, HERE / 'legacy_state_dict.pth', _use_new_zipfile_serialization=False)
  np.savez(HERE / 'legacy_state_dict_reference.npz',
           **{k: (v.float() if v.dtype == torch.bfloat16 else v).numpy() for k, v in state.items()})


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--sid-main', required=True, type=pathlib.Path)
  parser.add_argument('--sid-sida', required=True, type=pathlib.Path)
  args = parser.parse_args()
  sid_main(args.sid_main)
  sys.path.remove(str(args.sid_main))
  sida_edm(args.sid_sida)
  sida_edm2(args.sid_sida)
  legacy_state_dict()
  for path in sorted(HERE.iterdir()):
    print(f'{path.name}: {path.stat().st_size} bytes')


if __name__ == '__main__':
  main()
