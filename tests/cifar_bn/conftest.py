"""The tiny CIFAR-10 folder the application tests load through torchvision."""
import pytest

from helpers import write_tiny_cifar10


@pytest.fixture(scope="session")
def tiny_cifar(tmp_path_factory) -> str:
    """Root folder of a tiny CIFAR-10 copy: 150 training images, 40 test images."""
    return write_tiny_cifar10(str(tmp_path_factory.mktemp("cifar")))
