"""PyTorch twins of nt's presets, with the same state_dict names, for the
benchmarks and for loading nt checkpoints into PyTorch."""

import torch
from torch import nn


class MLP(nn.Module):
    """nt preset `mlp:input=...,hidden=H,depth=D,classes=C,bias=B`: flatten, fc1..fc{D+1}."""

    def __init__(self, inputs=784, hidden=512, depth=3, classes=10, bias=False):
        super().__init__()
        self.depth = depth
        width = inputs
        for i in range(1, depth + 1):
            setattr(self, f"fc{i}", nn.Linear(width, hidden, bias=bias))
            width = hidden
        setattr(self, f"fc{depth + 1}", nn.Linear(width, classes, bias=bias))

    def forward(self, x):
        x = torch.flatten(x, 1)
        for i in range(1, self.depth + 1):
            x = torch.relu(getattr(self, f"fc{i}")(x))
        return getattr(self, f"fc{self.depth + 1}")(x)


class LeNet(nn.Module):
    """nt preset `lenet` (28x28 inputs, the paper's LeNetMNIST with ReLU and max pooling)."""

    def __init__(self, channels=1, classes=10, bias=False):
        super().__init__()
        self.feature = nn.Sequential(
            nn.Conv2d(channels, 6, 5, 1, 2, bias=bias), nn.ReLU(), nn.MaxPool2d(2, 2),
            nn.Conv2d(6, 16, 5, 1, bias=bias), nn.ReLU(), nn.MaxPool2d(2, 2),
        )
        self.classifier = nn.Sequential(
            nn.Flatten(), nn.Linear(400, 120, bias=bias), nn.ReLU(),
            nn.Linear(120, 84, bias=bias), nn.ReLU(), nn.Linear(84, classes, bias=bias),
        )

    def forward(self, x):
        return self.classifier(self.feature(x))


class BasicBlock(nn.Module):
    def __init__(self, c_in, c_out, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.downsample = None
        if stride != 1 or c_in != c_out:
            self.downsample = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out))

    def forward(self, x):
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        identity = x if self.downsample is None else self.downsample(x)
        return torch.relu(out + identity)


class ResNet18(nn.Module):
    """nt preset `resnet18` (torchvision names, CIFAR stem: 3x3 conv, no max pool)."""

    def __init__(self, width=64, channels=3, classes=10):
        super().__init__()
        self.conv1 = nn.Conv2d(channels, width, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        c_in = width
        for stage in range(4):
            c_out = width << stage
            blocks = [BasicBlock(c_in, c_out, 1 if stage == 0 else 2), BasicBlock(c_out, c_out, 1)]
            setattr(self, f"layer{stage + 1}", nn.Sequential(*blocks))
            c_in = c_out
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(c_in, classes)

    def forward(self, x):
        x = torch.relu(self.bn1(self.conv1(x)))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))
