"""cifar_bn: the CIFAR-10 MLP application of torch_bn, reproducing the CS231n batch-norm notebook.

Data through torchvision, training on torch.optim, dashboards through TensorBoard, figures with
matplotlib; ``train.py`` at the repository root is its command line. It imports torch_bn; torch_bn
never imports it.
"""
