"""Defaults shared by every configuration. Each recipe file starts from `get_config()` (SiD's values) or
`method_config(method)` (the method's own defaults) and overrides.

Every key that any mode reads is declared here, and main.py locks the config, so a misspelt
`--config.x.y=v` fails at start-up instead of being silently ignored. A published recipe records its name
and variants (`recipe`, `recipe_variants`): a run refuses `--config.method=X` on a recipe written for
another method and names the recipe variant of X instead.
"""
import ml_collections


def get_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.method = "sid"             # a file in sida_jax/losses: sid | sida | sim | lsg | gdd
  c.seed = 0
  c.recipe = ""                # published recipe 'FILE:VARIANT' ('' = free-form: every value as given)
  c.recipe_variants = ""       # that file's variants with their methods: 'sid=sid sida=sida …'

  # Networks. `teacher` is an EDM/EDM2 snapshot .pkl or a folder written by `--mode convert`; when empty
  # the teacher is a freshly initialised `network` (smoke tests, benchmarks).
  c.teacher = ""
  c.teacher_key = "ema"
  c.network = ml_collections.ConfigDict()
  c.network.class_name = "EDMPrecond"
  c.network.kwargs = ml_collections.ConfigDict()
  c.dropout = -1.0             # dropout of generator and critic; < 0 keeps the teacher's
  c.dtype = "float32"          # compute dtype of the U-Nets: float32 | bfloat16 (params/σ math stay fp32)
  c.generator_init = ""        # SiD²A: a distilled generator (.pkl, SiD training-state-*.pt, converted folder or workdir)
  c.force_normalize = True     # EDM2 forced weight normalisation of trained networks in train mode

  c.batch_size = 256           # global
  c.grad_accum = 1             # rounds per optimiser step, exact: the gradient of one batch of batch_size
  # Devices (docs/scaling.md): a 'data' × 'fsdp' mesh, -1 = the devices left over. The batch is split
  # over every device; parameters, Adam moments, EMA and teacher along 'fsdp' (1: all replicated).
  c.mesh = ml_collections.ConfigDict()
  c.mesh.data = -1
  c.mesh.fsdp = 1
  c.mesh.min_shard_size = 16384  # elements; smaller leaves stay replicated
  c.compile_cache = ""         # folder of JAX's persistent compilation cache; '' = $SIDA_JAX_COMPILE_CACHE or
                               # ~/.cache/sida_jax/jax ($XDG_CACHE_HOME); 'off' = compile every start
  c.remat = "none"             # generator phase: none | blocks (U-Net blocks recomputed) | full (jax.checkpoint
                               # around the whole generator objective)
  c.total_kimg = 500_000.0
  c.init_sigma = 2.5           # generator input noise level σ_init

  c.loss = ml_collections.ConfigDict()
  c.loss.alpha = 1.2
  c.loss.tmax = 800.0
  c.loss.sigma_min = 0.002
  c.loss.sigma_max = 80.0
  c.loss.rho = 7.0
  c.loss.p_mean = -1.2         # fake-score σ log-normal (EDM2 teachers: −0.4, 1.0)
  c.loss.p_std = 1.2
  c.loss.sigma_data = 0.5
  c.loss.critic_scale = 1.0    # official `ls`
  c.loss.generator_scale = 100.0  # `lsg`
  c.loss.use_logvar = False    # EDM2 uncertainty weighting through the critic's logvar head
  # SiDA
  c.loss.discriminator_scale = 1.0   # `lsd` λ_D: 1 (EDM), 100 (EDM2)
  c.loss.adversarial_scale = 0.01    # `lsg_gan` λ_adv
  c.loss.logit_clamp = 10.0
  c.loss.critic_grad_clip = 1.0      # element-wise; 0 = off (EDM2 loop)
  c.loss.adv_pool_size = 0           # BCE pooling group; 0 = per-device batch (recipes: official batch-gpu)
  c.loss.critic_only_kimg = 100.0
  c.loss.sid_only_kimg = 200.0
  # SIM (set generator_scale = 1 for SIM and SiD-LSG, as their references do)
  c.loss.generator_p_mean = -3.5     # generator-loss σ log-normal
  c.loss.generator_p_std = 2.5
  c.loss.huber_c = 0.0               # pseudo-Huber constant; 0 = 0.00054·√(C·H·W)
  # SiD-LSG guidance scales: κ1 critic training, κ2/κ3 critic in the generator loss, κ4 teacher
  c.loss.kappa1 = 2.0
  c.loss.kappa2 = 2.0
  c.loss.kappa3 = 2.0
  c.loss.kappa4 = 2.0
  c.loss.null_label_rate = 0.1
  # SiD-LSG on Stable Diffusion (DDPM-form teachers): integer times t ~ U{min..max} and the generator's t_init
  c.loss.timestep_min = 20
  c.loss.timestep_max = 979
  c.loss.init_timestep = 625
  # GDD / GDD-I (the generator input level σ_max = 80 is the method's own)
  c.loss.feature_sigmas = (0.05, 0.5, 2.0)
  c.loss.head_width = 64
  c.loss.r1_gamma = 1e-4
  c.loss.r1_interval = 16            # lazy R1: a separate D step every 16 iterations, gain ×16
  c.loss.gan_sum_size = 0            # samples each official GAN sum runs over; 0 = per-device batch
  c.loss.freeze = False              # GDD-I: freeze the generator's convolutions as the paper names
  # GDD's discriminator: 'projected' (the paper's Projected GAN on pretrained feature networks, whose
  # weight files config.gdd.backbones names; see sida_jax/formats/feature_networks.py) or 'teacher' (the
  # frozen teacher's features at loss.feature_sigmas, for machines without those weights).
  c.gdd = ml_collections.ConfigDict()
  c.gdd.discriminator = "teacher"
  c.gdd.backbones = ""               # folder with the feature networks' (and the class embedding's) files
  c.gdd.feature_networks = ("deit_base_distilled_patch16_224", "tf_efficientnet_lite0")
  c.gdd.interp224 = True             # resize images under 224 to 224 (official --interp224)
  c.gdd.cout = 64                    # Projected GAN's mixing width
  c.gdd.ndf = 0                      # head width; 0 = Projected GAN's per-resolution table
  c.gdd.batch_stat_size = 0          # heads' batch-norm statistics groups; 0 = per-device batch (recipes: per-GPU)

  c.optim = ml_collections.ConfigDict()
  c.optim.critic_lr = 1e-5
  c.optim.generator_lr = 1e-5
  c.optim.critic_beta1 = 0.0
  c.optim.generator_beta1 = 0.0
  c.optim.beta2 = 0.999
  c.optim.eps = 1e-8           # 1e-6 in the official fp16 runs
  c.optim.generator_grad_clip = 0.0  # element-wise clip of generator gradients (SiD-LSG fp16: 1); 0 = off

  c.ema = ml_collections.ConfigDict()
  c.ema.halflife_mimg = 0.5
  c.ema.rampup_ratio = 0.05

  # Teacher training from scratch (`--mode teacher`, the MNIST demo): EDM loss on config.data.
  c.teacher_training = ml_collections.ConfigDict()
  c.teacher_training.lr = 1e-3
  c.teacher_training.lr_rampup_kimg = 10.0
  c.teacher_training.beta1 = 0.9

  c.augment_p = 0.0            # EDM AugmentPipe probability on generated (and real) images, critic phase

  # Data: real images for SiDA/GDD; labels for conditional SiD. Keys as sida_jax.data.make_dataset
  # ('' and 0 mean unset).
  c.data = ml_collections.ConfigDict()
  c.data.source = ""
  c.data.path = ""
  c.data.resolution = 0
  c.data.channels = 0
  c.data.use_labels = True
  c.data.xflip = False
  c.data.max_size = 0
  c.data.data_dir = ""
  c.data.split = "train"
  # Text-to-image runs (the teacher a Stable Diffusion pipeline folder): the training prompts, a .txt file
  # (one per line), the official prompt folder or tfds:NAME (its text feature `prompt_feature`).
  c.data.prompts = ""
  c.data.prompt_feature = "text"

  # Bookkeeping (in thousands of generated images, like the official loops).
  c.log_every_kimg = 10.0
  c.checkpoint_every_kimg = 500.0
  c.checkpoint_every_minutes = 30.0   # also by wall-clock time (0 = off); SIGTERM/SIGINT always save
  c.grid_every_kimg = 500.0
  c.eval_every_kimg = 0.0      # 0: no periodic evaluation (skipped with a warning without eval.detector_path)
  c.max_to_keep = 3

  # Sampling (`--mode sample`): EDM-style seeds, so image i never depends on batch size or devices.
  c.sample = ml_collections.ConfigDict()
  c.sample.source = ""         # '' = this workdir's EMA generator; or a .pkl / converted folder
  c.sample.seeds = "0-63"
  c.sample.batch_size = 64
  c.sample.teacher_steps = 0   # > 0: sample the teacher with the Heun sampler instead (NFE 2n−1)
  c.sample.write_png = True
  c.sample.prompts = ""        # text-to-image: a .txt file of prompts; image i gets prompt i mod their number
  # Whose random numbers make image i (sample, eval, periodic FID and grids): 'torch_cpu' = exactly what
  # torch.Generator('cpu') draws in the official scripts; 'torch_cuda' = torch.Generator('cuda') (normals only
  # close, see sida_jax/torch_random.py); 'numpy' = np.random.RandomState(seed).
  c.sample.rng = "torch_cpu"

  # Evaluation (`--mode eval`, periodic evaluation, `--mode ref`).
  c.eval = ml_collections.ConfigDict()
  c.eval.detector = "inception"   # inception | mnist
  c.eval.detector_path = ""       # pytorch-fid pt_inception-2015-12-05 weights (.pth or .npz)
  c.eval.ref_stats = ""           # EDM .npz / EDM2 .pkl reference statistics (or from --mode ref)
  c.eval.num_images = 50_000
  c.eval.batch_size = 250
  c.eval.seed_offset = 0
  c.eval.inception_score = True
  c.eval.precision_recall = False
  c.eval.prompts = ""             # text-to-image: the evaluation captions (.txt, e.g. COCO-2014 val captions)
  c.eval.resolution = 0           # resize generated images (PIL Lanczos) before the detector; 0 = as generated

  # Memory plan (`--mode plan`): per-device bytes of the state and of the step's activations.
  c.plan = ml_collections.ConfigDict()
  c.plan.device_gib = 16.0     # memory of one device, for the "fits" verdict
  c.plan.compile = False       # compile the step for XLA's activation scratch (minutes on CPU) instead of the estimate
  c.plan.estimate = True       # False (and compile False): the state alone, without the step's scratch

  # Conversion (`--mode convert`).
  c.convert = ml_collections.ConfigDict()
  c.convert.source = ""
  c.convert.safetensors = ""   # also (or instead, from a workdir) write a PyTorch-named safetensors file
  return c


# Values that differ between methods and do not depend on the dataset (ALGORITHMS.md §3.4, §4.3–4.4, §5.4,
# §6.8 / §8.5, §12.17). Everything else in get_config() is either SiD's and unread by the other methods, or
# set per dataset by the recipes.
METHOD_DEFAULTS = {
    "sid": {},
    "sida": {"loss.alpha": 1.0},
    "sim": {"loss.generator_scale": 1.0, "loss.generator_p_mean": -3.5, "loss.generator_p_std": 2.5},
    "lsg": {"loss.alpha": 1.0, "loss.generator_scale": 1.0, "loss.null_label_rate": 0.1},
    "gdd": {"init_sigma": 80.0, "optim.beta2": 0.99, "dropout": 0.0, "augment_p": 0.0,
            "gdd.discriminator": "projected"},
}


def method_config(method: str) -> ml_collections.ConfigDict:
  """get_config() with `method` and that method's own defaults."""
  if method not in METHOD_DEFAULTS:
    raise ValueError(f"method {method!r} is not one of {', '.join(METHOD_DEFAULTS)}")
  c = get_config()
  c.method = method
  for key, value in METHOD_DEFAULTS[method].items():
    section, _, name = key.rpartition(".")
    (c[section] if section else c)[name] = value
  return c
