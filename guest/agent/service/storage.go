package service

import (
	"context"
	"errors"
	"fmt"
	"time"

	"github.com/containerd/errdefs"
	"google.golang.org/protobuf/types/known/emptypb"

	agent "github.com/caisson-containers/caisson/api/agent/v1"
	"github.com/caisson-containers/caisson/guest/agent/boot"
	"github.com/caisson-containers/caisson/guest/agent/storage"
)

type storageService struct{ a *Agent }

var _ agent.StorageService = storageService{}

// defaultDeviceTimeout bounds the wait for a device when the request does not say.
const defaultDeviceTimeout = 10 * time.Second

func (s storageService) Mount(ctx context.Context, req *agent.MountStorageRequest) (*agent.MountStorageResponse, error) {
	dev := req.GetDevice()
	if dev == nil {
		return nil, fmt.Errorf("storage %s has no device: %w", req.GetStorageId(), errdefs.ErrInvalidArgument)
	}
	if req.GetDax() && dev.GetKind() != agent.DeviceKind_DEVICE_KIND_PMEM {
		return nil, fmt.Errorf("storage %s: dax needs a pmem device: %w", req.GetStorageId(), errdefs.ErrInvalidArgument)
	}
	timeout := defaultDeviceTimeout
	if ms := req.GetTimeoutMs(); ms > 0 {
		timeout = time.Duration(ms) * time.Millisecond
	}
	ctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	if err := s.a.devicesReady(ctx); err != nil {
		return nil, err
	}
	target, node, err := s.a.storages.Mount(ctx, storage.Request{
		ID:      req.GetStorageId(),
		Device:  storage.Device{PCIPath: dev.GetPciPath(), Serial: dev.GetSerial(), Tag: dev.GetTag()},
		Fstype:  req.GetFstype(),
		Options: req.GetOptions(),
		DAX:     req.GetDax(),
	})
	if err != nil {
		return nil, err
	}
	if req.GetStorageId() == boot.ModulesStorageID {
		if err := boot.UseModulesImage(ctx, target); err != nil {
			if uerr := s.a.storages.Unmount(ctx, req.GetStorageId()); uerr != nil {
				return nil, errors.Join(err, uerr)
			}
			return nil, err
		}
	}
	return &agent.MountStorageResponse{MountPoint: target, DevicePath: node}, nil
}

func (s storageService) Unmount(ctx context.Context, req *agent.UnmountStorageRequest) (*emptypb.Empty, error) {
	if err := s.a.storages.Unmount(ctx, req.GetStorageId()); err != nil {
		return nil, err
	}
	return &emptypb.Empty{}, nil
}
