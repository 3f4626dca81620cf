"""Shared fixtures: small synthetic prepared datasets (real Parquet/.npy files in a temp dir)."""
import pytest

from data_prep.synthetic import make_prepared_synthetic


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory):
    """300 users, 200 items, 3,000 interactions, image 16-d and text 8-d features."""
    return make_prepared_synthetic(tmp_path_factory.mktemp("data") / "tiny", num_users=300, num_items=200,
                                   num_interactions=3000, modalities={"image": 16, "text": 8}, seed=3)


@pytest.fixture(scope="session")
def signal_dataset(tmp_path_factory):
    """A catalogue whose features identify many small latent clusters: reading them pays off."""
    return make_prepared_synthetic(tmp_path_factory.mktemp("data") / "signal", num_users=1000, num_items=1000,
                                   num_interactions=8000, modalities={"image": 64, "text": 32}, seed=1,
                                   num_clusters=150)


@pytest.fixture(scope="session")
def trained_run(signal_dataset, tmp_path_factory):
    """A short training run on ``signal_dataset`` (4 epochs, d = 16): the model that export and serving use."""
    from lgmrec_dist.config import load_config
    from lgmrec_dist.train import train

    run = tmp_path_factory.mktemp("trained") / "run"
    train(signal_dataset, load_config("configs/demo.yaml", {"epochs": 4, "embedding_size": 16,
                                                            "train_batch_size": 512}), run)
    return run


@pytest.fixture(scope="session")
def ray_cluster():
    """One local Ray cluster for the whole test session (~3 s and ~420 MB to start)."""
    import os

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    import ray

    if not ray.is_initialized():
        ray.init(num_cpus=2, include_dashboard=False, object_store_memory=256 * 1024 * 1024,
                 log_to_driver=False, configure_logging=False)
    yield ray
    ray.shutdown()


@pytest.fixture
def one_thread():
    """torch on one thread for the test (tiny products: more threads only add synchronisation)."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def dst_first():
    """A function of a sampled batch: its layer 0 with the sources renamed so that the layer's destination
    nodes come first (DGL's block convention, as the samplers produce it; the batch stores it relabelled to
    sorted ids), the source ids in that order, and each sorted position's new index."""
    import torch

    def relabel(batch):
        taken = torch.zeros(len(batch.input_ids), dtype=torch.bool)
        taken[batch.dst_rows] = True
        order = torch.cat([batch.dst_rows, torch.nonzero(~taken).flatten()])
        position = torch.empty_like(order)
        position[order] = torch.arange(len(order))
        return batch.layers[0].relabel_sources(position, order), batch.input_ids[order], position

    return relabel
