// Package taskv2 serves containerd's task API v3 also under the v2 service name.
//
// containerd 1.7 talks to a shim only through "containerd.task.v2.Task", and
// containerd 2.0–2.2 do so for a shim whose start answer says version 2 (the
// answer Caisson's shim gives to their start protocol: see shim/launch). The two
// services' protos are the same but for their package name, so their messages
// are the same on the wire: the v3 implementation answers v2 calls unchanged.
package taskv2

import (
	"context"
	"fmt"
	"reflect"

	taskv3 "github.com/containerd/containerd/api/runtime/task/v3"
	"github.com/containerd/ttrpc"
	"google.golang.org/protobuf/reflect/protoreflect"
	"google.golang.org/protobuf/reflect/protoregistry"
)

// ServiceName is the task service containerd 1.7–2.2 call.
const ServiceName = "containerd.task.v2.Task"

// Register registers svc on server under ServiceName. Each method of the v3
// service descriptor becomes a v2 method that decodes the request as the v3
// message of the same name and calls svc's method of the same name.
func Register(server *ttrpc.Server, svc taskv3.TTRPCTaskService) error {
	desc, err := Desc(svc)
	if err != nil {
		return err
	}
	server.RegisterService(ServiceName, desc)
	return nil
}

// Desc is the v2 service description of svc.
func Desc(svc taskv3.TTRPCTaskService) (*ttrpc.ServiceDesc, error) {
	sd := taskv3.File_runtime_task_v3_shim_proto.Services().ByName("Task")
	if sd == nil {
		return nil, fmt.Errorf("task v3 proto has no Task service")
	}
	impl := reflect.ValueOf(svc)
	methods := make(map[string]ttrpc.Method, sd.Methods().Len())
	for i := 0; i < sd.Methods().Len(); i++ {
		md := sd.Methods().Get(i)
		name := string(md.Name())
		in, err := protoregistry.GlobalTypes.FindMessageByName(md.Input().FullName())
		if err != nil {
			return nil, fmt.Errorf("task v3 %s request type: %w", name, err)
		}
		fn := impl.MethodByName(name)
		if !fn.IsValid() {
			return nil, fmt.Errorf("task service %T has no method %s", svc, name)
		}
		methods[name] = method(in, fn)
	}
	return &ttrpc.ServiceDesc{Methods: methods}, nil
}

func method(in protoreflect.MessageType, fn reflect.Value) ttrpc.Method {
	return func(ctx context.Context, unmarshal func(any) error) (any, error) {
		req := in.New().Interface()
		if err := unmarshal(req); err != nil {
			return nil, err
		}
		out := fn.Call([]reflect.Value{reflect.ValueOf(ctx), reflect.ValueOf(req)})
		if err, _ := out[1].Interface().(error); err != nil {
			return nil, err
		}
		return out[0].Interface(), nil
	}
}

// Both is a task service that registers itself under the v3 and the v2 names.
type Both struct{ taskv3.TTRPCTaskService }

// RegisterTTRPC registers the service as "containerd.task.v3.Task" and ServiceName.
func (b Both) RegisterTTRPC(server *ttrpc.Server) error {
	taskv3.RegisterTTRPCTaskService(server, b.TTRPCTaskService)
	return Register(server, b.TTRPCTaskService)
}
