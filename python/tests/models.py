"""Small models for the tests: one that uses every op nt.arch/v1 has, in
the spellings the importer maps (modules, functions, methods)."""

import torch
import torch.nn.functional as F
from torch import nn


class Block(nn.Module):
    """conv-bn-act twice plus a depthwise conv, with a three-way residual sum."""

    def __init__(self, c, act):
        super().__init__()
        self.conv1 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c, eps=1e-3, momentum=0.05)
        self.act = act
        self.depthwise = nn.Conv2d(c, c, 3, padding="same", groups=c)
        self.conv2 = nn.Conv2d(c, c, (1, 1), stride=(1, 1))
        self.skip = nn.Identity()

    def forward(self, x):
        y = self.act(self.bn1(self.conv1(x)))
        z = self.depthwise(y)
        return self.conv2(z) + self.skip(x) + y


class Everything(nn.Module):
    """Every nt.arch/v1 op, several spellings of some."""

    def __init__(self, channels=3, classes=10):
        super().__init__()
        self.stem = nn.Conv2d(channels, 8, 3, stride=1, padding=1)
        self.stem_bn = nn.BatchNorm2d(8)
        self.blocks = nn.Sequential(Block(8, nn.ReLU6(inplace=True)), Block(8, nn.Hardswish()))
        self.pool = nn.AvgPool2d(2)
        self.down = nn.Conv2d(8, 16, 3, stride=2, padding=1, bias=False)
        self.act = nn.LeakyReLU(0.2)
        self.gelu = nn.GELU(approximate="tanh")
        self.head = nn.ModuleDict(
            {
                "fc1": nn.Linear(16 * 2 * 2, 32),
                "bn": nn.BatchNorm1d(32),
                "drop": nn.Dropout(0.25),
                "fc2": nn.Linear(32, classes, bias=False),
            }
        )

    def forward(self, x):
        x = F.relu(self.stem_bn(self.stem(x)))
        x = self.blocks(x)
        x = F.max_pool2d(x, kernel_size=3, stride=2, padding=1)  # 16 -> 8
        x = self.pool(x)  # 8 -> 4
        x = self.act(self.down(x))  # 4 -> 2
        x = F.hardtanh(x, -2.0, 2.0) + torch.sigmoid(x) + x.tanh()
        x = self.gelu(F.silu(x))
        x = F.adaptive_avg_pool2d(x, (2, 2))
        x = x.view(x.size(0), -1)
        x = self.head["fc1"](x)
        x = self.head["bn"](x).relu()
        x = self.head["drop"](x)
        x = F.dropout(x, 0.1, self.training)
        return self.head["fc2"](x)


class Upsampling(nn.Module):
    """AdaptiveAvgPool2d to a size larger than its input (VGG on 32x32), and
    a non-square output."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, stride=2, padding=1)
        self.pool = nn.AdaptiveAvgPool2d((5, 3))
        self.fc = nn.Linear(4 * 5 * 3, 6)

    def forward(self, x):
        return self.fc(torch.flatten(self.pool(self.conv(x)), 1))


class Mlp(nn.Module):
    """A flat input ([N, features]) with a BatchNorm1d and reshape(-1, F)."""

    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(12, 16)
        self.bn = nn.BatchNorm1d(16)
        self.fc2 = nn.Linear(16, 3)

    def forward(self, x):
        x = torch.reshape(x, (-1, 12))
        return self.fc2(torch.relu(self.bn(self.fc1(x))))


class Fusable(nn.Module):
    """A small residual network with the new element-wise ops, for fusing
    with ntctl: conv-bn stages, a residual sum, both pools, two linears."""

    def __init__(self, classes=10):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.act1 = nn.Hardswish()
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(8)
        self.act2 = nn.GELU()
        self.pool = nn.MaxPool2d(2)
        self.fc1 = nn.Linear(8 * 2 * 2, 16)
        self.act3 = nn.LeakyReLU(0.1)
        self.drop = nn.Dropout(0.1)
        self.fc2 = nn.Linear(16, classes)

    def forward(self, x):
        x = self.act1(self.bn1(self.conv1(x)))
        x = self.act2(self.bn2(self.conv2(x)) + x)
        x = F.adaptive_avg_pool2d(torch.sigmoid(self.pool(x)), 2)
        x = torch.flatten(x, 1)
        return self.fc2(self.drop(self.act3(torch.tanh(self.fc1(x)))))
